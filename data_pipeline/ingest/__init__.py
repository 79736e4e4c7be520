"""Ingest: files, folders, globs and fsspec URLs split into raw records that know their file,
line and array index (readers), parsed into the normalised sample (conversation) by record
format (formats, record_fields); corpus and demo_data produce text and the built-in demo set."""
