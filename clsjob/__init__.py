"""clsjob: distributed batch text classification on Ray."""
