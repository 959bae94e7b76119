"""`dctl`, the operator CLI: argument parsing and output formatting only; the work lives in the
packages each subcommand calls (simulator, profiles, physics validation, later the admin API).
"""
