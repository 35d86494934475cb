"""Applications the tests run under a real server (``tests.apps.<module>:app``)."""
