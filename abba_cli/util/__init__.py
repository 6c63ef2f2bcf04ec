"""Small services every command uses: atomic files and output-directory checks (files), reading a user's YAML
(yaml_file), SIGINT/SIGTERM handling (signals), and the one cached probe of whether the hub is reachable (hub)."""
