"""What a search leaves behind: checkpoints (store, structure) and Parquet tables, on any filesystem
(`orchestrator.files`)."""
