"""`llmk report`: one self-contained HTML page and its Markdown twin over run folders."""
