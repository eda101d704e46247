"""An independent model of the task contract (v1, v1.1), for differential tests."""
