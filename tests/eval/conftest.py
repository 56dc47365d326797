"""The tiny BERT and classification files of the finetune tests, shared with the evaluate tests."""

from tests.train.test_finetune import bert_dir, classify_files  # noqa: F401  (fixtures)
