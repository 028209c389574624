"""The command-line tools: each parses its flags into a config object, calls the Python API
(erase/api.py) and prints. Nothing below erase/cli/ imports from here."""
