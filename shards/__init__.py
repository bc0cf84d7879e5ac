"""The layer both apps stand on: the shard format, storage (local and S3), progress display.

shardgen/ (the writer) and trainer/ (the reader) import from here; nothing here imports either of them.
"""
