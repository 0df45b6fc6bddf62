"""Conversations that persist: a SQLite store shared by `ember chat` and `ember history`."""

from ember.store.conversations import Conversation, Store, chat_messages

__all__ = ["Conversation", "Store", "chat_messages"]
