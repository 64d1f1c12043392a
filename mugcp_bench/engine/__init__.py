"""Training and evaluation of one method: the trainer, precision, callbacks, feature cache, resources."""
