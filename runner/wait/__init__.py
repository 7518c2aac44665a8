"""Waiting: until the database is ready (ready), and until it has this image's revisions (head,
for init containers)."""
