"""nbdqcow: an NBD server with its own qcow2 engine that never moves a mapped cluster."""

__version__ = "0.1.0"
