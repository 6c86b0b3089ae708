"""What a model is, apart from its forward: its configuration, the built-in sizes, its named outputs, its training
loss."""
