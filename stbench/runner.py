"""(being written)"""
from .errors import UserError


def add_arguments(parser):
    pass


def execute(args):
    raise UserError("'runner' is not built yet")
