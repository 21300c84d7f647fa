"""The data-access and support package every function imports."""
