"""Locks between runners: the migration lock (migration), its key (key), and the start-up gate
for storms of identical copies (gate)."""
