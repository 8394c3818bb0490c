"""vswitch: a software L2 switch for VMs and containers."""

__version__ = "0.1.0"
