"""The one exception type for mistakes a user can fix.

The command-line entry points turn a `UserError` into a single line on stderr
and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user: the message names the problem and the fix."""
