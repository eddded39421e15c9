"""Training data: sources (files, folders, datasets) → formats (text, alpaca, chat) → packed rows → batches."""
