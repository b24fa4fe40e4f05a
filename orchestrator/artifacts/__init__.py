"""What a search leaves behind: checkpoints (store, structure, weights) and Parquet tables, on any filesystem."""
