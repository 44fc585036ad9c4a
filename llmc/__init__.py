"""The machinery of train_gpt2.py, one module per concern, as llm.c keeps llmc/ beside train_gpt2.c.
README.md, "Reading the code", says what each module defines. No two modules import each other."""
