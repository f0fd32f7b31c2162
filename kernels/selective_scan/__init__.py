"""Mamba-1 selective scan: `selective_scan` over a sequence and `selective_scan_step` for decoding."""

from kernels.selective_scan.api import selective_scan, selective_scan_step

__all__ = ["selective_scan", "selective_scan_step"]
