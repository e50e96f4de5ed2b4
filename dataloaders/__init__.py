"""Annotation readers, feature stores, tokenisation and the retrieval datasets."""
