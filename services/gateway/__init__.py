"""HTTP gateway: the API and the invoke broker."""
