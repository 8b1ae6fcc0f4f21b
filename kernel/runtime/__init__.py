"""Daemon plumbing shared by vfmd and every service daemon: servers, config, notify, figures."""
