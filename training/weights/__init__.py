"""Small third-party data files used by training (see README.md here for provenance and licences)."""
