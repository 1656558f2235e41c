"""Opening images: a file name, ``json:`` filename or ``--image-opts`` string -> a
driver stack (raw, qcow2, null-co, filters), with qemu's format probing, its block-0
guard for probed raw images, and backing files opened through here for the qcow2
engine.  The CLI and the server open images only through :func:`open_image` (or
:func:`image_file` for commands that work on the image file itself)."""

from nbdqcow.image.backing import open_backing_file
from nbdqcow.image.open import (
    NotPlainImage,
    image_file,
    image_tree,
    open_image,
    probe_file,
)
from nbdqcow.image.registry import DRIVERS, PROTOCOLS, register

__all__ = ["DRIVERS", "PROTOCOLS", "NotPlainImage", "image_file", "image_tree", "open_backing_file",
           "open_image", "probe_file", "register"]
