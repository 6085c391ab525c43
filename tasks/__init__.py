"""Units of work the flows call: data loading, the training loop, evaluation, artifact I/O."""
