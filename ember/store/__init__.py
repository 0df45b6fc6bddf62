"""Conversations that persist: a SQLite store shared by `ember chat` and `ember history`."""

from ember.store.conversations import Conversation, ConversationNotFound, Store, chat_messages

__all__ = ["Conversation", "ConversationNotFound", "Store", "chat_messages"]
