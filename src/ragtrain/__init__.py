"""ragtrain: end-to-end retrieval-augmented generation training.

Three models trained jointly -- a generator (causal LM or seq2seq), a question encoder and a context
encoder -- with the knowledge base re-encoded and re-indexed as the context encoder changes.
"""

__version__ = "0.1.0"
