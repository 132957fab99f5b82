"""Example applications served by doordown (`python3 doordown.py serve examples.counter:app`)."""
