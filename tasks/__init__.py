"""Units of work the flows call: data, training loop, evaluation, tracking, artifact I/O."""
