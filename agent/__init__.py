"""Classroom Edge Agent: capture, sensing, live lessons and fleet health for classroom mini-PCs."""

__version__ = "0.1.0"
