"""Training the suite's trainable parts: the loop, cache keys, the feature cache, decoder heads."""
