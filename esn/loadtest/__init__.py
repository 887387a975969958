"""The load generator (`esn loadtest`): thousands of simulated handsets, open-loop."""
