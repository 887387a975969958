"""`esn exercise`: dispatcher training on a simulated network.

An exercise file (TOML) gives a fleet, field crews and a timeline of scripted events;
some of them wait on the dispatcher as a real incident would (an SOS repeats until it is
acknowledged, a crew asks again when nobody answers). `script` reads and checks the file,
`run` plays it against a real broker and server, `debrief` says how the dispatcher did,
in the terminal and as an HTML report with a timeline (docs/exercises.md).
"""
