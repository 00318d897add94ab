"""Orchestrators: from a service's spec to the right tasks (replicated: N slots; global: one per
node), restarting what fails according to the restart policy, replacing tasks of lost nodes and
rolling out spec changes."""
