"""Test rigs that make one machine look like several devices: network namespaces and cgroup limits."""
