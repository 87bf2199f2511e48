// Python renderings used in messages, and the file-name pattern grammar.

#include "torchser/detail/python_format.h"

#include <torchser/errors.h>

#include "test_utils.h"

namespace torchser::detail {
namespace {

TEST(PythonReprTest, QuotesLikePython) {
  EXPECT_EQ(python_repr(""), "''");
  EXPECT_EQ(python_repr("1oo"), "'1oo'");
  EXPECT_EQ(python_repr("it's"), "\"it's\"");
  EXPECT_EQ(python_repr("say \"hi\""), "'say \"hi\"'");
  EXPECT_EQ(python_repr("both ' and \""), "'both \\' and \"'");
}

TEST(PythonReprTest, EscapesLikePython) {
  EXPECT_EQ(python_repr("a\\b"), "'a\\\\b'");
  EXPECT_EQ(python_repr("\t\n\r"), "'\\t\\n\\r'");
  EXPECT_EQ(python_repr(std::string("\x00\x01\x7f", 3)), "'\\x00\\x01\\x7f'");
  EXPECT_EQ(python_repr("caf\xc3\xa9"), "'caf\xc3\xa9'"); // printable é kept
  EXPECT_EQ(python_repr("\xc2\xa0"), "'\\xa0'"); // NBSP is not printable
  EXPECT_EQ(python_repr("\xe2\x80\xa8"), "'\\u2028'");
  EXPECT_EQ(python_repr("\xff"), "'\\xff'"); // invalid UTF-8 byte
}

TEST(PythonStripTest, StripsPythonWhitespace) {
  EXPECT_EQ(python_strip("  10 KB \t\n"), "10 KB");
  EXPECT_EQ(
      python_strip("\x1c\x1f"
                   "5GB\x0b\x0c"),
      "5GB");
  EXPECT_EQ(
      python_strip("\xc2\xa0"
                   "5GB\xe3\x80\x80"),
      "5GB");
  EXPECT_EQ(python_strip("   "), "");
  EXPECT_EQ(python_strip("caf\xc3\xa9 "), "caf\xc3\xa9");
}

TEST(FilenamePatternTest, ReplacesEverySuffixField) {
  const FilenamePattern pattern("model{suffix}.safetensors");
  EXPECT_TRUE(pattern.has_suffix());
  EXPECT_EQ(pattern.format(""), "model.safetensors");
  EXPECT_EQ(
      pattern.format("-00001-of-00002"), "model-00001-of-00002.safetensors");
  EXPECT_EQ(FilenamePattern("{suffix}/a{suffix}").format("-x"), "-x/a-x");
}

TEST(FilenamePatternTest, DoubledBracesAreLiteral) {
  const FilenamePattern pattern("{{name}}{suffix}.bin}}");
  EXPECT_EQ(pattern.format("-1"), "{name}-1.bin}");
  EXPECT_FALSE(FilenamePattern("{{suffix}}").has_suffix());
  EXPECT_EQ(FilenamePattern("{{suffix}}").format("-1"), "{suffix}");
}

TEST(FilenamePatternTest, PatternWithoutSuffixIsKeptVerbatim) {
  const FilenamePattern pattern("my-pattern");
  EXPECT_FALSE(pattern.has_suffix());
  EXPECT_EQ(pattern.format("-00001-of-00002"), "my-pattern");
}

TEST(FilenamePatternTest, OtherFieldsAndLoneBracesAreValueErrors) {
  EXPECT_THROW_MESSAGE(
      FilenamePattern("model{variant}.bin"),
      ValueError,
      "Invalid filename_pattern 'model{variant}.bin': unsupported replacement "
      "field '{variant}'. torchser substitutes only '{suffix}' ('{{' and '}}' "
      "stand for literal braces).");
  EXPECT_THROW_CONTAINS(FilenamePattern("model{}.bin"), ValueError, "'{}'");
  EXPECT_THROW_CONTAINS(
      FilenamePattern("model{suffix:>8}.bin"), ValueError, "'{suffix:>8}'");
  EXPECT_THROW_CONTAINS(
      FilenamePattern("model{suffix"),
      ValueError,
      "single '{' encountered in format string.");
  EXPECT_THROW_CONTAINS(
      FilenamePattern("model}.bin"),
      ValueError,
      "single '}' encountered in format string.");
}

} // namespace
} // namespace torchser::detail
