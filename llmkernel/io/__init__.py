"""Reading files, shared by every stage: compression, tables, CoNLL, chat jsonl, token shards, tokenizers."""
