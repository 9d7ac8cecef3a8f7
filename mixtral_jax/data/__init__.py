"""Text in, token ids out: text sources (files, globs, hf:, tfds:, gs://, bundled corpora), the tokenizers and
vocabulary extension. Imports io/, config and errors, never the model."""
