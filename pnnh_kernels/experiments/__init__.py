"""Small, real experiments that run on a CPU in minutes (the demo, depth studies)."""
