"""The qcow2 format engine (spec: qemu docs/interop/qcow2.txt)."""
