"""User-facing errors: reported as one line naming the problem, without a stack trace."""


class UserError(Exception):
    """A mistake in configuration, paths or inputs that the user can fix."""
