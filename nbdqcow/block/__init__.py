"""The block layer: the BlockDriver seam, host files and the raw driver."""
