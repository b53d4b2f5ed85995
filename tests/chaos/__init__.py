"""Fault injection for the chaos tests: a loopback TCP proxy and a seeded chaos driver."""
