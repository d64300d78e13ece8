"""The ``batchgen`` command line and the local launcher behind ``make run``."""
