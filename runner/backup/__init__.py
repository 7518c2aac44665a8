"""Backups: pg_dump streamed to S3 with a manifest (the commit point), listing, and restore."""
