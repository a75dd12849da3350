"""A backup as stored: its layout and manifest, its encryption, and reading it back (verify, stored)."""
