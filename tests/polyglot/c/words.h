/* Declared for task.c, defined in words.c: the build must compile every .c file. */
#ifndef WORDS_H
#define WORDS_H
#include <stddef.h>

size_t count_words(const char *text);

#endif
