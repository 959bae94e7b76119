"""The controller's imperative shell: the control cycle ticked on the wall clock, its commands carried out
through the fleet, traffic reports folded in, decisions stored and published."""
