"""Training and evaluation of one method: the trainer, optimizers and schedules, callbacks, interrupts, resources."""
