"""Shipped performance-model profiles (JSON) and the script that derives them (derive.py)."""
